"""Evaluation: the paper's image protocol on pairs of photos, video metrics on clips, and readable reports.

Modules, bottom first: landmarks (pose, expression), identity (embedding models, similarity scale, retrieval),
flicker (optical-flow temporal metric), fid (Inception features, Frechet distance), clip (one clip or image),
runner (swap and score a pairs list), report (JSON, Markdown, PNG, side-by-side tables).
"""
