"""Small cross-encoders for tests, built here (no downloads): the bundled MiniLM's encoder under a one-label
classifier head of random weights, saved as sentence-transformers' CrossEncoder saves it, or as a plain
transformers folder."""

import json
from pathlib import Path

QUERY = "Where does the cat sleep?"
DOCUMENTS = [
    "The cat sleeps on the warm mat by the kitchen door.",
    "Stock markets fell sharply on Tuesday after the announcement.",
    "Cats like to sleep in sunny spots, often for most of the day.",
    "A recipe for bread: flour, water, salt and yeast.",
    "Where the cat sleeps depends on the season and the house.",
]
# A document of about 600 tokens: past every model's maximum here, so it is truncated or refused.
LONG_DOCUMENT = " ".join(["The cat sleeps in the garden shed when the afternoon sun warms its roof."] * 40)


def build_cross_encoder(path: Path, activation: str | None = "sigmoid", max_length: int | None = None,
                        sentence_transformers: bool = True, seed: int = 11) -> str:
    """A one-label BertForSequenceClassification on the bundled encoder, its classifier random (spread wide
    enough that scores differ). `activation`: what the CrossEncoder is saved with ('sigmoid', 'identity', or None
    for its default); `sentence_transformers` False: a plain transformers folder, as many hub rerankers are."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    from embserve.engine.model import resolve_source

    source = resolve_source("bundled")
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
        model.classifier.bias.fill_(0.3)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    if not sentence_transformers:
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        return str(path)
    raw = path.with_name(path.name + "-raw")
    model.save_pretrained(str(raw))
    tokenizer.save_pretrained(str(raw))
    fn = {"sigmoid": torch.nn.Sigmoid(), "identity": torch.nn.Identity(), None: None}[activation]
    CrossEncoder(str(raw), device="cpu", activation_fn=fn, max_length=max_length).save(str(path))
    return str(path)


def set_config(path: str, **entries) -> None:
    """Adds entries to a model folder's config.json (where older CrossEncoders saved their activation)."""
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config.update(entries)
    config_path.write_text(json.dumps(config))
