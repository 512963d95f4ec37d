"""PyTorch interoperability: `export` writes a trained CAL; `torch_model` needs torch only."""
