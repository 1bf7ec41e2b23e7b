"""Performance accounting: jaxpr FLOP counter (`flops`) and device peak / MFU table (`peak`)."""
