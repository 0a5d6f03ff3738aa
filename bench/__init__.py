"""Benchmarks of mbcompile against the peers (PyTorch eager, torch.compile, ONNX Runtime)."""
