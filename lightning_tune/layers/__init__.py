"""Drop-in nn.Linear replacements: LoRA / DoRA adapters, NF4 (QLoRA) and int8 weights, oneDNN inference."""
