"""Generative vision and multimodal models, small enough to train on two CPU cores.

Images are float tensors `[N, C, H, W]` in [0, 1]. The data (`data.py`) is scikit-learn's bundled
handwritten digits or a folder of the user's images; each model family registers one
`kinds.VisionKind` that `genforge vision` dispatches on.
"""
