"""Hugging Face checkpoint -> vlmserve package: graphs (onnx_graph), precision variants
(precision), fusions (optimize), the parity report (report) and a reference onnxruntime runner
(onnx_runner). `python -m vlmexport.export --help`."""
