"""Offline evidence for the detector backend: sources (open_nsfw, RapidOCR, EfficientNet-Lite0,
NudeNet, the user's own ONNX classifiers), the rules that map what they see onto a policy's
term and attribute values, and what a policy can be judged from here.

Submodules import their model runtimes lazily; :mod:`~icm.moderation.evidence.catalog` is
what policy validation reads.
"""
