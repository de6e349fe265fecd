"""Character-level tokenizer for the tiny diffusion LM.

One token per printable ASCII character (plus newline), so every task string
round-trips exactly, and a handful of special tokens in the LLaDA mould.
"""
MASK, EOS, PAD, USER, ASSISTANT, UNK = (
    "<|mask|>", "<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|unk|>")
SPECIALS = [PAD, EOS, MASK, USER, ASSISTANT, UNK]
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII
VOCAB_SIZE = 128  # specials + alphabet = 102, rounded up; spare ids are never produced

# `<|user|>{p}\n<|assistant|>`; an assistant turn ends with <|endoftext|> (as LLaDA's SFT data).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast (imported here, so the constants above load without transformers)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(ALPHABET))}
    # BPE without merges == one token per character; no pre-tokenizer, so spaces are ordinary chars.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()  # join tokens without inserting spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, mask_token=MASK, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    return tok
