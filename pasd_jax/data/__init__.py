"""Training data: Real-ESRGAN degradations and the grain input pipeline."""
