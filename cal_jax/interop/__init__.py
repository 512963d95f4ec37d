"""From a trained checkpoint to other frameworks.

export         a checkpoint to a PyTorch file (`.safetensors`, `.pt`) or ONNX (`cal_jax.convert`)
torch_mapping  the CAL variables under PyTorch's names and layouts
onnx_export    the PyTorch network traced to ONNX, one graph per modality
torch_model    the CAL inference path in plain PyTorch (torch only; copied alone)
torch_files    reading the exported files (torch only; copied beside torch_model)
"""
