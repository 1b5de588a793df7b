"""Weight import (HF safetensors, GGUF) and export (HF safetensors dir)."""
