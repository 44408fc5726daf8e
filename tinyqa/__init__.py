"""tinyqa: turn a question-answer dataset into a LoRA / QLoRA fine-tuned, swept and served QA model on Ray."""

__version__ = "0.1.0"
