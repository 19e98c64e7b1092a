"""Placeholder: replaced by the tokenizer module (chat templates, streaming detokenizer)."""


def load_tokenizer(folder):
    return None
