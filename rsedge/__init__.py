"""rsedge: export, quantize and run remote-sensing vision-language models at the edge."""

__version__ = "0.1.0"
