"""Integrations of fastmix's online mixing with other training frameworks (optional dependencies):
`fastmix.integrations.hf_trainer` for Hugging Face transformers.Trainer."""
