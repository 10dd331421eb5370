"""The scripts that write the bundled demo data in `data/assets/` (instructions and tokenizer, chat, preference
pairs) from fixed seeds; tests check the shipped files are exactly what they write."""
