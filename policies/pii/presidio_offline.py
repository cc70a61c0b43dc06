"""Presidio, fully offline: no model, suffix-list or any other download, ever.

* The NLP engine is spaCy over a blank English pipeline written to the data dir (or an NER
  pipeline the user installed); loading never falls back to ``spacy.cli.download``.
* A blank pipeline has no lemmatizer, so lemmas are taken from ``token.norm_``: context words
  ("phone", "card", ...) still raise scores.
* ``EmailRecognizer`` validates domains with tldextract, which fetches the public-suffix list
  on first use unless told not to: its extractor is replaced by one that uses the bundled
  snapshot only.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path

_patched = False
_lock = threading.Lock()


def _offline_tldextract() -> None:
    global _patched
    with _lock:
        if _patched:
            return
        import tldextract
        import tldextract.tldextract as module

        module.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        _patched = True


def blank_pipeline(data_dir: Path) -> str:
    """The path of a blank English spaCy pipeline, written once (offline: spaCy ships it)."""
    import spacy

    path = data_dir / "spacy-blank-en"
    if not (path / "config.cfg").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{threading.get_ident()}")
        spacy.blank("en").to_disk(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def nlp_engine(model: str):
    """A spaCy NLP engine over ``model`` (a package name or a path), never downloading."""
    import spacy
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.nlp_engine.ner_model_configuration import NerModelConfiguration

    class OfflineSpacyEngine(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {}
            for m in self.models:
                name = m["model_name"]
                if not (spacy.util.is_package(name) or Path(name).exists()):
                    raise RuntimeError(f"spaCy pipeline {name!r} is not installed; the gateway never downloads models")
                self.nlp[m["lang_code"]] = spacy.load(name)

        def _doc_to_nlp_artifact(self, doc, language: str) -> NlpArtifacts:
            entities, scores = self._get_updated_entities(self._get_entities(doc), self._get_scores_for_entities(doc))
            tokens = _Tokens(doc)  # Presidio walks the tokens once per finding: build Token objects once
            art = NlpArtifacts(
                entities=entities,
                tokens=tokens,
                tokens_indices=[t.idx for t in tokens],
                lemmas=[t.lemma_ or t.norm_ for t in tokens],
                nlp_engine=self,
                language=language,
                scores=scores,
            )
            # Presidio tests `lemma in keywords` for every context word: a set, not a list.
            art.keywords = set(art.keywords)
            return art

    config = NerModelConfiguration(
        model_to_presidio_entity_mapping={
            "PERSON": "PERSON",
            "PER": "PERSON",
            "GPE": "LOCATION",
            "LOC": "LOCATION",
            "LOCATION": "LOCATION",
        },
        labels_to_ignore=["ORG", "NORP", "CARDINAL", "DATE", "MONEY", "ORDINAL", "PERCENT", "QUANTITY", "TIME"],
    )
    engine = OfflineSpacyEngine(models=[{"lang_code": "en", "model_name": model}], ner_model_configuration=config)
    engine.load()
    return engine


class _NoCopy(list):
    """Presidio's context enhancer deep-copies the findings it is given (≈ 20 % of an
    analysis); ours are fresh and used once, so the copy is skipped."""

    def __deepcopy__(self, memo: dict) -> list:
        return list(self)


class _Tokens(list):
    """A doc's tokens, with where each ends: the token of a finding is found by bisection."""

    def __init__(self, doc) -> None:
        super().__init__(doc)
        self.ends = [t.idx + len(t) for t in self]


def token_at(start: int, tokens, tokens_indices) -> int:
    """The first token that ends after ``start`` (or starts at it), as Presidio's
    ``_find_index_of_match_token`` finds it by walking every token from the first: once per
    finding, that walk made a chunk dense with findings (4 KiB of IP addresses) quadratic."""
    if isinstance(tokens, _Tokens):
        i = bisect.bisect_right(tokens.ends, start)
        if i < len(tokens):
            return i
        raise ValueError("Did not find the finding in the list of tokens although it is expected to be found")
    for i, token in enumerate(tokens):
        if tokens_indices[i] == start or start < tokens_indices[i] + len(token):
            return i
    raise ValueError("Did not find the finding in the list of tokens although it is expected to be found")


def context_enhancer():
    from presidio_analyzer.context_aware_enhancers import LemmaContextAwareEnhancer

    class Enhancer(LemmaContextAwareEnhancer):
        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            return super().enhance_using_context(text, _NoCopy(raw_results), nlp_artifacts, recognizers, context)

        @staticmethod
        def _find_index_of_match_token(word: str, start: int, tokens, tokens_indices) -> int:
            return token_at(start, tokens, tokens_indices)

    return Enhancer()


def setup() -> None:
    _offline_tldextract()
