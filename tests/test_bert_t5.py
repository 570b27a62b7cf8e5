"""BERT and T5 pretraining on CPU: the sentence splitter, --split-sentences preprocessing, the
masked-LM tokenizer adapter, config validation, SDPA padding masks, and the real `train.py`
(loss falls; TP1 == TP2 over gloo, with GQA/MQA, the T5 case through cross-attention)."""
import json

import numpy
import pytest
import torch

from framework.config import ConfigError
from framework.data.sentences import split_sentences
from framework.models.bert.data import adapter as bert_adapter
from framework.models.t5.data import adapter_for_spans as t5_adapter
from framework.tokenizer import (Tokenizer, embedded_mlm_tokenizer,
                                 embedded_tokenizer)
from helpers import config_error, losses, run_train
from tests.test_config import load
from perturb import perturb_checkpoint


# --------------------------------------------------------------------------------------------
# sentence splitter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Hello world. This is it! Is it? Yes.", ["Hello world.", "This is it!", "Is it?", "Yes."]),
    ("Dr. Smith met Mr. Jones. They talked.", ["Dr. Smith met Mr. Jones.", "They talked."]),
    ("Fruit, e.g. Apples, i.e. Food. Next.", ["Fruit, e.g. Apples, i.e. Food.", "Next."]),
    ("He lives in the U.S. now. Really.", ["He lives in the U.S. now.", "Really."]),
    ("Pi is 3.14 exactly. It costs $2.50 today.", ["Pi is 3.14 exactly.",
                                                    "It costs $2.50 today."]),
    ("12+35=47. 7*8=56. 93-41=52.", ["12+35=47.", "7*8=56.", "93-41=52."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
    ("no capital. after this one. The end", ["no capital. after this one.", "The end"]),
    ("Wait... What? Done", ["Wait...", "What?", "Done"]),
    ("First para\n\nsecond para. Third.", ["First para", "second para.", "Third."]),
    ("  ", []),
])
def test_sentence_splitter(text, expected):
    assert split_sentences(text) == expected


# --------------------------------------------------------------------------------------------
# preprocess --split-sentences
# --------------------------------------------------------------------------------------------
def test_preprocess_split_sentences_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_tools.preprocess import main

    tok = embedded_mlm_tokenizer()
    tok.save(str(tmp_path / "tok"))
    docs = ["1+2=3. 4+5=9. 7*8=56.", "10-3=7.", "", "2*2=4. 3*3=9."]
    with open(tmp_path / "in.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    rc = main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tmp_path / "tok"),
               "--split-sentences", "--append-eod", "--output-prefix", str(tmp_path / "out"),
               "--no-progress"])
    assert rc == 0
    ds = IndexedDataset(str(tmp_path / "out_text_sentence"))
    # as Megatron-LM's preprocess_data.py: the empty document is a boundary with no sequence
    want = [split_sentences(d) for d in docs]
    assert list(ds.document_indices) == list(numpy.cumsum([0] + [len(w) for w in want]))
    want = [w for w in want if w]
    got = [tok.decode(ds[i]) for i in range(len(ds))]
    flat = [s for w in want for s in w]
    ends = set(numpy.cumsum([len(w) for w in want]) - 1)
    for i, (g, s) in enumerate(zip(got, flat)):
        # the EOD ends the last sentence of each document only
        assert g == (s + "<|endoftext|>" if i in ends else s), (i, g, s)


def test_embedded_sentence_corpus(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from framework.data.embedded import prepare_embedded, sentence_documents

    prefix = prepare_embedded(str(tmp_path), 30, sentences=True)
    assert prefix.endswith("arith_text_sentence")
    assert prepare_embedded(str(tmp_path), 30, sentences=True) == prefix  # cached
    ds = IndexedDataset(prefix)
    counts = numpy.diff(ds.document_indices)
    assert len(counts) == 30 and counts.min() >= 4  # 4-8 problems per document
    tok = embedded_mlm_tokenizer()
    first = list(sentence_documents(1))[0]
    assert " ".join(tok.decode(ds[i]) for i in range(counts[0])) == first


# --------------------------------------------------------------------------------------------
# tokenizer adapter
# --------------------------------------------------------------------------------------------
def test_embedded_mlm_tokenizer_adapter():
    tok = embedded_mlm_tokenizer()
    bert = bert_adapter(tok)
    assert (bert.cls, bert.sep, bert.mask, tok.pad) == (1, 2, 3, 0)
    assert list(bert.inv_vocab) == list(range(tok.vocab_size))  # id order (mcore draws by index)
    with pytest.raises(AttributeError):
        bert.pad  # mcore pads with -1: padding never looks like a token
    t5 = t5_adapter(tok, 10)
    assert t5.bos == 5 and t5.eos == 4
    assert tok.decode(t5.additional_special_tokens_ids[:2]) == "<extra_id_0><extra_id_1>"
    with pytest.raises(ConfigError, match="needs at least 100"):
        t5_adapter(tok, 100)
    with pytest.raises(ConfigError, match="no CLS token.*model.type=bert"):
        bert_adapter(embedded_tokenizer())
    with pytest.raises(ConfigError, match="0 sentinel tokens"):
        t5_adapter(embedded_tokenizer(), 0)


def test_hf_wordpiece_and_t5_style_tokenizers(tmp_path):
    """A BERT WordPiece tokenizer (bert-base-uncased layout) and a T5-style one (pad 0, eos,
    <extra_id_N>, no CLS/SEP/MASK/BOS), built offline."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
             "##s", "."]
    raw = RawTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    hf.save_pretrained(str(tmp_path / "bert"))  # and back, as tokenizer.path=<dir> loads it
    from framework.config import TokenizerConfig
    from framework.tokenizer import build_tokenizer

    bert = build_tokenizer(TokenizerConfig(path=str(tmp_path / "bert")))
    a = bert_adapter(bert)
    assert (a.cls, a.sep, a.mask) == (3, 4, 5)
    assert a.inv_vocab[9] == "##s"  # whole-word masking sees the continuation piece
    assert bert.encode("the cats sat.") == [6, 7, 9, 8, 10]

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}
    for i in range(3):
        vocab[f"<extra_id_{i}>"] = 7 - i  # T5 numbers its sentinels downwards from the top
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    t5 = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                           eos_token="</s>", unk_token="<unk>"))
    b = t5_adapter(t5, 3)
    assert b.additional_special_tokens_ids == [7, 6, 5]
    assert b.bos == 0 and b.eos == 1  # the decoder starts with the pad id, as in HF T5
    with pytest.raises(ConfigError, match="no CLS"):
        bert_adapter(t5)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def test_bert_and_t5_configs_compose():
    large = load("model=bert_large", "parallel=tp2_pp2").model
    assert (large.num_layers, large.hidden_size, large.num_attention_heads, large.seq_length) == (
        24, 1024, 16, 512)
    base = load("model=t5_base", "parallel=tp2").model
    assert (base.enc_layers, base.num_layers, base.hidden_size, base.ffn, base.kv_channels) == (
        12, 12, 768, 3072, 64)
    assert base.position_embedding_type == "relative" and base.decoder_seq_length == 128
    assert load("model=t5_small").model.num_attention_heads == 8


BAD = [
    (["model=t5_tiny", "parallel=pp2"], ["pipeline_model_parallel_size", "model.type=t5",
                                         "encoder-decoder"]),
    (["model=t5_tiny", "model.num_attention_heads=3", "model.hidden_size=96", "parallel=tp2"],
     ["model.num_attention_heads=3", "tensor_model_parallel_size=2"]),
    (["model=bert_tiny", "model.num_query_groups=3"], ["model.num_query_groups=3"]),
    (["model=t5_tiny", "model.decoder_seq_length=null"], ["model.decoder_seq_length"]),
    (["model=t5_tiny", "model.decoder_seq_length=8"], ["model.decoder_seq_length=8",
                                                       "data.masking_probability"]),
    (["model=gpt_tiny", "model.add_binary_head=true"], ["model.add_binary_head"]),
    (["model=bert_tiny", "model.position_embedding_type=relative"],
     ["model.position_embedding_type=relative", "model.type=bert"]),
    (["model=bert_tiny", "data=mock"], ["data=mock", "model.type=bert"]),
    (["model=t5_tiny", "parallel=tp2_sp", "model.decoder_seq_length=33"],
     ["model.decoder_seq_length=33", "sequence_parallel"]),
    (["model=bert_tiny", "data.masking_probability=0"], ["data.masking_probability"]),
]


@pytest.mark.parametrize("overrides,words", BAD)
def test_validation_errors_name_fields(overrides, words):
    msg = config_error(*overrides)  # a ConfigError of one line
    for w in words:
        assert w in msg, (w, msg)


# --------------------------------------------------------------------------------------------
# attention masks
# --------------------------------------------------------------------------------------------
def _sdpa(mask_type, heads=2):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from framework.models.layers import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                            use_cpu_initialization=True, attention_dropout=0.0)
    return SDPAttention(cfg, 1, mask_type, "self", pg_collection=_Pg())


class _Pg:
    class tp:  # noqa: N801  (a TP group of one)
        @staticmethod
        def rank():
            return 0

        @staticmethod
        def size():
            return 1


def test_sdpa_padding_masks_and_bias():
    from megatron.core.transformer.enums import AttnMaskType

    torch.manual_seed(0)
    s, b, n, d = 5, 2, 2, 8
    q, k, v = (torch.randn(s, b, n, d) for _ in range(3))
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    attn = _sdpa(AttnMaskType.padding)
    key_pad = ~valid[:, None, None, :]  # [b,1,1,s], True = masked (BERT b11s, T5 encoder)
    out = attn(q, k, v, key_pad)
    # reference: softmax over the unpadded keys only, bidirectional
    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    scores = qb @ kb.transpose(-1, -2) / d ** 0.5
    ref = torch.softmax(scores.masked_fill(key_pad, float("-inf")), -1) @ vb
    assert torch.allclose(out, ref.permute(2, 0, 1, 3).reshape(s, b, -1), atol=1e-5)
    # mcore's b1ss form masks whole padded query rows: no NaN anywhere
    b1ss = ~(valid[:, None, :, None] & valid[:, None, None, :])
    out2 = attn(q, k, v, b1ss)
    assert torch.isfinite(out2).all()
    assert torch.allclose(out2[:3, 0], out[:3, 0], atol=1e-5)
    # a [1,n,s,s] relative-position bias broadcasts with the [b,1,1,s] padding mask
    bias = torch.randn(1, n, s, s)
    out3 = attn(q, k, v, key_pad, attention_bias=bias)
    ref3 = torch.softmax((scores + bias).masked_fill(key_pad, float("-inf")), -1) @ vb
    assert torch.allclose(out3, ref3.permute(2, 0, 1, 3).reshape(s, b, -1), atol=1e-5)
    # causal + bias (the T5 decoder)
    out4 = _sdpa(AttnMaskType.causal)(q, k, v, None, attention_bias=bias)
    causal = torch.ones(s, s).triu(1).bool()
    ref4 = torch.softmax((scores + bias).masked_fill(causal, float("-inf")), -1) @ vb
    assert torch.allclose(out4, ref4.permute(2, 0, 1, 3).reshape(s, b, -1), atol=1e-5)


# --------------------------------------------------------------------------------------------
# the real train.py
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,extra", [
    ("bert_tiny", ["model.num_query_groups=2"]),  # GQA, binary head on
    ("t5_tiny", ["model.num_query_groups=1"]),  # MQA: KV heads replicated over TP, cross-attn too
])
def test_learns_and_tp2_gloo_matches_tp1(tmp_path, model, extra):
    """The real train.py on the embedded (sentence-split) data: from one seed checkpoint, the
    loss falls at TP1 and TP2 (gloo) reproduces TP1's first steps."""
    common = [f"model={model}", *extra, "optimizer.lr_warmup_steps=2",
              "optimizer.lr_decay_steps=12"]
    run_train(*common, "train.max_steps=0", "train.eval_interval=0",
              f"checkpoint.dir={tmp_path}/seed", cwd=tmp_path, name="seed")
    perturb_checkpoint(str(tmp_path / "seed"))  # non-zero biases, non-unit norms
    meta = json.loads((tmp_path / "seed" / "iter_0000000" / "framework.json").read_text())
    assert meta["config"]["model"]["type"] == model.split("_")[0]
    run = [*common, "checkpoint.save=false", f"checkpoint.load={tmp_path}/seed"]
    tp1 = run_train(*run, "train.max_steps=12", "train.eval_interval=12", cwd=tmp_path,
                    name="tp1").records
    tp2 = run_train(*run, "train.max_steps=4", "train.eval_interval=0", "parallel=tp2",
                    cwd=tmp_path, name="tp2").records
    a, b = losses(tp1), losses(tp2)
    assert a[12] < a[1] - 0.3, a
    assert any("eval_loss" in r for r in tp1)
    if model == "bert_tiny":  # the sentence-order loss of the binary head is logged beside it
        sop = [r["sop_loss"] for r in tp1 if "sop_loss" in r]
        assert len(sop) == 12 and all(0.0 < x < 2.0 for x in sop), sop
    assert sorted(b) == [1, 2, 3, 4]
    for s in b:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])
