"""Captions → input_ids."""
import pytest
import torch

from xlx_fast.text import CaptionTokenizer, basic_tokenize, load_tokenizer

VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
        ["a", "red", "bus", "on", "the", "street", "##s", "play", "##ing", ",", "."]


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def test_wordpiece(vocab_file):
    tok = CaptionTokenizer.from_vocab(vocab_file)
    ids, mask = tok(["A red bus, playing on the streets.", "zebra"])
    idx = {w: i for i, w in enumerate(VOCAB)}
    row0 = [idx[w] for w in ["[CLS]", "a", "red", "bus", ",", "play", "##ing", "on", "the",
                             "street", "##s", ".", "[SEP]"]]
    assert ids[0, :13].tolist() == row0 and (ids[0, 13:] == 0).all()
    assert ids[1, :3].tolist() == [idx["[CLS]"], idx["[UNK]"], idx["[SEP]"]]
    assert ids.shape == (2, 20) and ids.dtype == torch.int64
    assert torch.equal(mask, ids > 0)
    assert not tok.is_fallback
    # A directory holding vocab.txt works too.
    assert torch.equal(CaptionTokenizer.from_vocab(vocab_file.parent)(["a bus"])[0], tok(["a bus"])[0])


def test_decode_reads_word_ids_back_joining_wordpieces(vocab_file):
    tok = CaptionTokenizer.from_vocab(vocab_file)
    ids, _ = tok(["A red bus, playing on the streets."])
    words = ids[0, 1:12].tolist()  # between [CLS] and [SEP]
    assert tok.decode(words) == "a red bus , playing on the streets ."
    assert tok.decode([]) == ""
    assert tok.decode([len(VOCAB) + 5]) == f"[{len(VOCAB) + 5}]"  # past the vocabulary: shown as an id
    # the fallback's hashing cannot be undone: ids are shown as ids, never as made-up words
    assert CaptionTokenizer.fallback().decode([1234, 99]) == "[1234] [99]"


def test_truncation_keeps_sep(vocab_file):
    tok = CaptionTokenizer.from_vocab(vocab_file)
    ids, mask = tok("red " * 50)
    assert ids.shape == (1, 20) and mask.all()
    assert ids[0, 0].item() == VOCAB.index("[CLS]") and ids[0, -1].item() == VOCAB.index("[SEP]")


def test_basic_tokenize_lowercases_strips_accents_splits_punctuation():
    assert basic_tokenize("Héllo, WORLD!  it's") == ["hello", ",", "world", "!", "it", "'", "s"]


def test_fallback_is_labelled_and_only_for_random_weights():
    tok = load_tokenizer(None, real_weights=False)
    assert tok.is_fallback and "fallback" in tok.name
    ids, _ = tok(["a red bus", "a red bus"])
    assert torch.equal(ids[0], ids[1]) and ids[0, 0] == 101 and ids[0, 4] == 102
    assert ((ids >= 0) & (ids < 30522)).all()
    with pytest.raises(ValueError, match="--vocab"):
        load_tokenizer(None, real_weights=True)


def test_hf_tokenizer_wrapper():
    class Fake:
        pad_token_id, cls_token_id, sep_token_id = 0, 7, 8

        def __call__(self, text, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [len(w) + 10 for w in text.split()]}

    ids, _ = CaptionTokenizer.from_hf(Fake())(["ab abc"])
    assert ids[0, :4].tolist() == [7, 12, 13, 8]


def test_bad_inputs(vocab_file, tmp_path):
    tok = CaptionTokenizer.from_vocab(vocab_file)
    with pytest.raises(ValueError, match="at least one"):
        tok([])
    with pytest.raises(TypeError, match="strings"):
        tok([3])
    with pytest.raises(FileNotFoundError):
        CaptionTokenizer.from_vocab(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="not a BERT vocabulary"):
        CaptionTokenizer.from_vocab(bad)
