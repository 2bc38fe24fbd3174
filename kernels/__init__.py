"""Hand-written Triton kernels. Import lazily (common.attention does): importing triton is not free."""
