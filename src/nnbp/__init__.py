"""nnbp: the TP 5 neural-network lab as a reproducible DVC + MLflow pipeline."""
