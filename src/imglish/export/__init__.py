"""Export: ONNX graphs of imglish models, checked with onnxruntime (``imglish export``)."""

from imglish.export.onnx import PARTS, ExportResult, export_onnx, verify_onnx

__all__ = ["PARTS", "ExportResult", "export_onnx", "verify_onnx"]
