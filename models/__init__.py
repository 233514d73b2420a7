"""The GRU and FFNN CLV models, their training on rolling origins, and the evaluation against baselines."""
