"""bench.corpus's short-text mix: what `bench.ab --workload short` and bench.run's short headline send."""

import statistics

from bench.corpus import bundled_token_counter, load_or_build


def test_the_short_mix_is_queries_of_10_to_20_tokens_and_passage_heads_of_about_50():
    corpus = load_or_build(None, 0)
    texts = corpus.short(400, 0)
    assert texts == corpus.short(400, 0)  # the same texts for every arm of a run
    count = bundled_token_counter()
    queries = set(corpus.queries)
    query_tokens = count([t for t in texts if t in queries])
    head_tokens = count([t for t in texts if t not in queries])
    assert 150 < len(query_tokens) < 250  # about half of each
    assert min(query_tokens) >= 10 and max(query_tokens) <= 20
    assert 40 <= statistics.fmean(head_tokens) <= 60
