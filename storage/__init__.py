"""Everything that touches disk formats and tracking: Parquet, artifact layout, hashing, MLflow."""
