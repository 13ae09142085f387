"""A tokenizer of bytes for tests that need text in and out of a model without training one."""

EOS = 2


class ByteTokenizer:
    """Bytes as ids 3..258; 2 is EOS."""

    vocab_size, eos_id, bos_id = 512, EOS, None

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")
