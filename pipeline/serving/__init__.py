"""Serving a registered model: deployable artifacts (bundle), the ONNX Runtime app, the prediction ledger."""
