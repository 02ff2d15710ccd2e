"""Plain-PyTorch reference kernels and Triton kernels. Imports nothing else of compressor."""
