"""Inference: the pyfunc models MLflow serves, batch predict and embed, reading any input."""
