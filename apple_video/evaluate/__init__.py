"""Evaluation: the paper's image protocol on pairs of photos, video metrics on clips, and readable reports.

Modules, bottom first: landmarks (pose fit, expression), pose (HopeNet, else the landmark fit), identity (embedding
models, similarity scale, retrieval), flicker (optical-flow temporal metric), fid (Inception features, Frechet
distance), clip (one clip or image, with the FF++ 10-frame and IDBench-V figures), runner (swap and score a pairs
list), report (JSON, Markdown, PNG, side-by-side tables).
"""
