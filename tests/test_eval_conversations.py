"""The generator's multi-turn sets, the picture scorer and the conversation measurements (issue 25
items 2 and 5): follow-ups that only the history answers, pictures read off their pixels (the shape
classifier's accuracy measured on fresh generator pictures), assistant-turn PPL with and without
the history on the same targets, prompt-following accuracy through a real Conversation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from _generation_util import one_thread  # noqa: F401  (tiny models: one thread)
from jam_metaseq import quickstart_data as qd
from jam_metaseq.data.documents import tokenize_document
from jam_metaseq.data.tokenizers import ByteTokenizer
from jam_metaseq.eval.conversations import history_ppl, last_exchange_mask, prompt_following
from jam_metaseq.eval.drawing import read_picture, score_pictures, train_shape_classifier
from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS, make_shape_image, shape_samples
from jam_metaseq.models import build_model, preset
from jam_metaseq.vocab import tiny_manifest

BYTES = ByteTokenizer()


class QuadrantCodes:
    """A stand-in image tokenizer: 2x2 codes from the quadrants' red channel (deterministic)."""

    grid, n_codes, resolution = (2, 2), 32, 32

    def encode_images(self, images):
        return np.stack([np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.int64)[..., 0] // 8 for im in images])


@pytest.fixture(scope="module")
def classifier():
    return train_shape_classifier(size=32)


# ---- the generator's conversations ---------------------------------------------------------------
def test_conversations_are_seeded_and_follow_ups_refer_to_the_history():
    a = qd.conversation_samples(40, size=32, seed=3)
    b = qd.conversation_samples(40, size=32, seed=3)
    assert [s.kind for s in a] == [s.kind for s in b]
    assert [s.kind for s in a] != [s.kind for s in qd.conversation_samples(40, size=32, seed=4)]  # held-out: another seed
    kinds = {k for s in a for k in s.kind.split("+")}
    assert kinds == {"describe", *qd.FOLLOW_UPS}
    for s in a:
        roles = [r for r, _ in s.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) in (4, 6)
        first = s.pictures[0]
        kinds = s.kind.split("+")
        follow = kinds[1] if kinds[0] == "describe" else kinds[0]  # the first follow-up
        user_text = " ".join(p for p in s.turns[2][1] if isinstance(p, str))
        answer = s.turns[3][1]
        if follow == "recolour":
            new = answer[1]
            assert (new.shape, new.background) == (first.shape, first.background) and new.colour != first.colour
            assert new.colour in user_text
            # the same shape at the same place: the pixels that are not background coincide
            mask = lambda p: (np.asarray(p.image) != BACKGROUNDS[p.background]).any(-1)  # noqa: E731
            assert (mask(first) == mask(new)).all()
        elif follow == "ask_background":
            assert user_text == "what colour was the background?" and first.background in answer[0]
            assert first.background not in user_text  # only the history holds the answer


def test_conversation_documents_tokenize_with_images_in_both_roles(tmp_path):
    vocab = tiny_manifest(text_size=256, conversation_tokens=True)
    docs = []
    for s in qd.conversation_samples(12, size=32, seed=0):
        codes = QuadrantCodes().encode_images([p.image for p in s.pictures])
        docs.append(qd.conversation_document(s, images=list(codes)))
    qd.write_jsonl(tmp_path / "c.jsonl", docs)
    roles_with_images = set()
    for d in qd.read_jsonl(tmp_path / "c.jsonl"):
        tokens, mask = tokenize_document(d, vocab=vocab, text_tokenizer=BYTES)
        assert mask.any() and not mask[:list(tokens).index(vocab.assistant_id) + 1].any()
        roles_with_images |= {t["role"] for t in d["turns"] for seg in t["segments"] if "image_tokens" in seg}
    assert roles_with_images == {"user", "assistant"}
    with pytest.raises(ValueError, match="more images"):
        qd.conversation_document(qd.conversation_samples(1, size=32, seed=0)[0], images=["a.png"] * 9)


def test_drawing_prompts_end_with_the_picture_asked_for():
    single = qd.drawing_prompts(20, size=32, seed=1, follow_up=False)
    follow = qd.drawing_prompts(20, size=32, seed=1, follow_up=True)
    assert all(p.kind == "single" and len(p.turns) == 2 for p in single)
    assert {p.kind for p in follow} == {"recolour", "background"} and all(len(p.turns) == 4 for p in follow)
    for p in single:
        t = p.target
        assert f"{t.colour} {t.shape}" in p.turns[0][1][0]
    for p in follow:
        t, first = p.target, p.pictures[0]
        assert t.shape == first.shape and (t.colour, t.background) != (first.colour, first.background)


# ---- reading pictures ---------------------------------------------------------------------------
def test_read_picture_by_hand(classifier):
    rng = np.random.default_rng(0)
    for shape, colour, background in (("circle", "red", "white"), ("square", "blue", "black"),
                                      ("triangle", "yellow", "grey")):
        img = make_shape_image(shape, colour, size=32, rng=rng, background=background)
        r = read_picture(img, classifier=classifier)
        assert (r.background, r.colour, r.shape) == (background, colour, shape)
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["grey"])
    r = read_picture(blank, classifier=classifier)
    assert (r.background, r.colour, r.shape) == ("grey", None, None)


def test_the_shape_classifier_is_measured_on_fresh_pictures_and_reads_blurred_ones(classifier):
    assert classifier.reliable and classifier.accuracy >= 0.95  # on 300 fresh pictures; measured 1.0 (seeds 0-3)
    fresh = shape_samples(150, size=32, seed=99)
    rng = np.random.default_rng(1)

    def degrade(img):  # what a small VQ decoder does to a picture: soft edges, noise
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
        return Image.fromarray(np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8))

    scores = score_pictures([degrade(s.image) for s in fresh], fresh, classifier=classifier)
    # measured over 4 seeds of pictures and noise: background, colour 1.0; shape 0.98-0.99
    assert scores["background"] >= 0.95 and scores["colour"] >= 0.95 and scores["shape"] >= 0.85
    # negative control: the same pictures against shuffled targets score near chance
    # (measured: all 0.01-0.04, colour 0.14-0.22)
    wrong = score_pictures([s.image for s in fresh], fresh[1:] + fresh[:1], classifier=classifier)
    assert wrong["all"] < 0.2 and wrong["colour"] < 0.4
    assert score_pictures([None], fresh[:1], classifier=classifier)["all"] == 0.0
    assert score_pictures(list(np.zeros((1, 32, 32, 3))), fresh[:1])["shape"] is None  # no classifier: not scored
    assert set(COLOURS) >= {s.colour for s in fresh}


# ---- the measurements ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat_model():
    vocab = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2), conversation_tokens=True)
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=vocab.size, max_positions=256, init_std=0.3)).eval()
    return model, vocab


def test_history_ppl_scores_the_same_answer_tokens_with_and_without_the_history(tiny_chat_model):
    model, vocab = tiny_chat_model
    docs = [qd.conversation_document(s, images=list(QuadrantCodes().encode_images([p.image for p in s.pictures])))
            for s in qd.conversation_samples(6, size=32, seed=2)]
    out = history_ppl(model, docs, vocab=vocab, text_tokenizer=BYTES)
    assert out["exchanges"] == sum(len(d["turns"]) // 2 - 1 for d in docs)
    assert out["with_history"]["tokens"] == out["without_history"]["tokens"] > 0
    assert out["ratio"] == pytest.approx(out["without_history"]["ppl"] / out["with_history"]["ppl"])
    # the with-history figure, recomputed from the model's logits by hand
    nll, count = 0.0, 0
    for d in docs:
        for end in range(4, len(d["turns"]) + 1, 2):
            tokens, mask = tokenize_document({"turns": d["turns"][:end]}, vocab=vocab, text_tokenizer=BYTES)
            mask = last_exchange_mask(tokens, mask, vocab=vocab)
            # the evaluation rule (eval/context.py): the document alone from position 0, its first
            # token context only
            x = torch.tensor(tokens.tolist())
            with torch.no_grad():
                logp = F.log_softmax(model(x[None, :-1])[0].double(), dim=-1)
            lp = logp[torch.arange(len(tokens) - 1), x[1:]]
            nll -= float(lp[torch.from_numpy(mask[1:])].sum())
            count += int(mask[1:].sum())
    assert count == out["with_history"]["tokens"]
    assert out["with_history"]["nll"] == pytest.approx(nll, rel=1e-5)


def test_prompt_following_draws_reads_and_scores(tiny_chat_model):
    from jam_metaseq.image_tokenizer import VQGAN, ImageTokenizer
    from jam_metaseq.image_tokenizer import preset as vq_preset

    torch.manual_seed(0)
    vq = ImageTokenizer(VQGAN(vq_preset("tiny")))
    vocab = tiny_manifest(text_size=256, image_codes=vq.n_codes, image_grid=vq.grid, conversation_tokens=True)
    model = build_model(preset("tiny", vocab_size=vocab.size, max_positions=512, init_std=0.3)).eval()
    prompts = qd.drawing_prompts(2, size=32, seed=0, follow_up=True)
    out = prompt_following(model, prompts, vocab=vocab, text_tokenizer=BYTES, image_tokenizer=vq, seeds=(0, 1))
    assert out["n"] == 4 and len(out["pictures"]) == 4
    assert all(p is not None and p.size == (32, 32) for p in out["pictures"])  # one picture per answer
    assert 0.0 <= out["all"] <= out["colour"] <= 1.0 and out["shape_classifier_accuracy"] >= 0.9


def test_caption_following_draws_each_prompt_after_its_caption():
    """A model without conversation tokens (a variant after continued pretraining) is asked by the
    picture's caption after ``<eos>``: one picture per prompt and seed, the codes those of the
    engine's own answer to that caption (CFG on), each read and scored against the prompt's target."""
    from jam_metaseq.eval.conversations import caption_following
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.engine import Engine
    from jam_metaseq.image_tokenizer import VQGAN, ImageTokenizer
    from jam_metaseq.image_tokenizer import preset as vq_preset

    torch.manual_seed(0)
    vq = ImageTokenizer(VQGAN(vq_preset("tiny")))
    vocab = tiny_manifest(text_size=256, image_codes=vq.n_codes, image_grid=vq.grid)
    model = build_model(preset("tiny", vocab_size=vocab.size, max_positions=512, init_std=0.3)).eval()
    prompts = qd.drawing_prompts(2, size=32, seed=0, follow_up=False)
    out = caption_following(model, prompts, vocab=vocab, text_tokenizer=BYTES, image_tokenizer=vq, seeds=(0, 1),
                            batch_size=3)
    assert out["n"] == 4 and all(p is not None and p.size == (32, 32) for p in out["pictures"])
    t = prompts[1].target
    caption = f"a {t.colour} {t.shape} on a {t.background} background"
    ids = [vocab.eos] + [vocab.text_start + b for b in caption.encode()]
    ref = Engine(model, vocab=vocab).generate([ids], seeds=[1], config=GenerationConfig(
        max_new_tokens=vocab.image_tokens_per_image + 2, force_image_first=True, min_images=1, max_images=1))[0]
    want = vq.decode_codes(np.asarray([ref.images[0].codes]))[0]
    assert np.array_equal(np.asarray(out["pictures"][3]), np.asarray(want))
    assert out == {**out, **score_pictures(out["pictures"], [p.target for p in prompts for _ in (0, 1)],
                                           classifier=train_shape_classifier(size=32))}


def test_evaluate_conversations_reads_files_as_the_instruct_data_were(tmp_path):
    """The evaluation stage's job on a checkpoint on disk: JSONL conversations (pictures as files
    beside the JSONL, in two folders), converted by their format and fitted, give ``history_ppl``'s
    figures; drawing prompts give their scores and a picture sheet; files without any follow-up
    exchange give no history figure instead of an error."""
    from _chat_util import write_chat_checkpoint
    from checkpoints_tools.load import load_model
    from jam_metaseq.eval.conversations import evaluate_conversations
    from jam_metaseq.image_tokenizer import load_image_tokenizer

    paths = write_chat_checkpoint(tmp_path / "model")
    model, _, vocab = load_model(paths["checkpoint"])
    samples = qd.conversation_samples(4, size=32, seed=5)
    files, docs = [], []
    for k, part in enumerate((samples[:2], samples[2:])):
        d = tmp_path / f"set{k}"
        (d / "img").mkdir(parents=True)
        rows = []
        for i, s in enumerate(part):
            rels = [f"img/{i}-{j}.png" for j in range(len(s.pictures))]
            for rel, p in zip(rels, s.pictures):
                p.image.save(d / rel)
            rows.append(qd.conversation_document(s, images=rels))
            docs.append(qd.conversation_document(s, images=[str(d / r) for r in rels]))
        files.append(str(qd.write_jsonl(d / "valid.jsonl", rows)))
    prompts = {"single": qd.drawing_prompts(1, size=32, seed=0, follow_up=False)}
    out = evaluate_conversations(checkpoint=str(paths["checkpoint"]), conversations=files, max_tokens=512,
                                 image_tokenizer=str(paths["vq"]), drawing=prompts, seeds=(0,), out_dir=str(tmp_path))
    ref = history_ppl(model, docs, vocab=vocab, text_tokenizer=BYTES,
                      image_tokenizer=load_image_tokenizer(paths["vq"], device="cpu"))
    h = out["history_ppl"]
    assert h["exchanges"] == ref["exchanges"] and h["with_history"] == pytest.approx(ref["with_history"]["ppl"])
    assert h["without_history"] == pytest.approx(ref["without_history"]["ppl"])
    assert out["prompt_following"]["single"]["n"] == 1 and (tmp_path / "drawing-single.png").is_file()
    single = tmp_path / "single.jsonl"
    qd.write_jsonl(single, [{"turns": d["turns"][:2]} for d in docs])
    out = evaluate_conversations(checkpoint=str(paths["checkpoint"]), conversations=[str(single)], max_tokens=512)
    assert out == {"history_ppl": None}
