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
import re
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


# What Presidio reads of a word in a blank pipeline: its norm (the lemma), and whether it is a
# stop word or punctuation (``NlpArtifacts.set_keywords``). spaCy computes some twenty more
# attributes of every distinct word it reads (shape, prefix, suffix, like_url, ...), interning
# the strings: with no model to feed them to, that was ~40 % of tokenising a text of distinct
# words (IP addresses, identifiers) and memory kept for the life of the worker.
_BLANK_ATTRS = ("NORM", "IS_STOP", "IS_PUNCT")


# A word that is a dotted quad, alone or before a comma or semicolon. spaCy splits it the same
# whatever its digits ([quad] or [quad, ","]), but learns every distinct one as a new word: the
# largest cost of a text dense with IP addresses, and memory kept for the life of the worker.
# A blank pipeline reads it with every digit a "0" (one word for all of one shape); its lemma,
# the quad itself, is put back.
_QUAD_WORD = re.compile(r"(?<!\S)[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(?=[,;]?(?!\S))")
_DIGIT = re.compile(r"[1-9]")


def mask_quads(text: str) -> str:
    """``text`` with every digit of its dotted-quad words a "0" (``text`` itself if none)."""
    if _QUAD_WORD.search(text) is None:
        return text
    return _QUAD_WORD.sub(lambda m: _DIGIT.sub("0", m.group()), text)


def nlp_engine(model: str, blank: bool = False):
    """A spaCy NLP engine over ``model`` (a package name or a path), never downloading.
    ``blank``: ``model`` has no trained component: its words get only the attributes Presidio
    reads (a trained one needs them all as features)."""
    import spacy
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.nlp_engine.ner_model_configuration import NerModelConfiguration
    from spacy import attrs

    class OfflineSpacyEngine(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {}
            for m in self.models:
                name = m["model_name"]
                if not (spacy.util.is_package(name) or Path(name).exists()):
                    raise RuntimeError(f"spaCy pipeline {name!r} is not installed; the gateway never downloads models")
                nlp = spacy.load(name)
                if blank:
                    keep = {attrs.IDS[a] for a in _BLANK_ATTRS}
                    getters = nlp.vocab.lex_attr_getters
                    nlp.vocab.lex_attr_getters = {k: f for k, f in getters.items() if k in keep}
                self.nlp[m["lang_code"]] = nlp

        def process_text(self, text: str, language: str) -> NlpArtifacts:
            if not blank:
                return super().process_text(text, language)
            masked = mask_quads(text)
            doc = self.nlp[language](masked)
            return self._doc_to_nlp_artifact(doc, language, text if masked is not text else None)

        def is_stopword(self, word: str, language: str) -> bool:
            return self._attr(word, language, attrs.IS_STOP)

        def is_punct(self, word: str, language: str) -> bool:
            return self._attr(word, language, attrs.IS_PUNCT)

        def _attr(self, word: str, language: str, attr: int) -> bool:
            """A word's attribute as ``vocab[word]`` has it, without adding the word to the
            vocabulary (Presidio asks this of every lemma: a new word would be kept for good)."""
            vocab = self.nlp[language].vocab
            if word in vocab or attr not in vocab.lex_attr_getters:
                return bool(getattr(vocab[word], attrs.NAMES[attr].lower()))
            return bool(vocab.lex_attr_getters[attr](word))

        def _doc_to_nlp_artifact(self, doc, language: str, original: str | None = None) -> NlpArtifacts:
            entities, scores = self._get_updated_entities(self._get_entities(doc), self._get_scores_for_entities(doc))
            tokens = _Tokens(doc)  # Presidio walks the tokens once per finding: build Token objects once
            lemmas = [t.lemma_ or t.norm_ for t in tokens]
            if original is not None:  # a masked dotted quad's lemma is the quad itself
                masked = doc.text
                for i, t in enumerate(tokens):
                    a, b = t.idx, t.idx + len(t)
                    if masked[a:b] != original[a:b]:
                        lemmas[i] = original[a:b]
            art = NlpArtifacts(
                entities=entities,
                tokens=tokens,
                tokens_indices=[t.idx for t in tokens],
                lemmas=lemmas,
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
    from presidio_analyzer import RecognizerResult
    from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer, LemmaContextAwareEnhancer

    recognizer_key = RecognizerResult.RECOGNIZER_IDENTIFIER_KEY
    boosted_key = RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY

    class Enhancer(LemmaContextAwareEnhancer):
        """Presidio's lemma enhancer, deciding the same boosts with less work per finding.

        Presidio gathers each finding's context words (the lemmas of up to five keywords before
        it and its own), deduplicates them through a set and tests every context word of its
        recognizer against every one of them: ≈ 15 µs a finding, mostly to learn that none
        matched (a text dense with IP addresses has only addresses around each). Here whether a
        lemma holds one of a recognizer's context words is asked once per distinct lemma, and
        Presidio's own search runs only for a finding whose context holds one."""

        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            if context or nlp_artifacts is None or not nlp_artifacts.tokens:
                return super().enhance_using_context(text, _NoCopy(raw_results), nlp_artifacts, recognizers, context)
            results = list(raw_results)  # fresh and used once: no deep copy (see _NoCopy)
            by_id = {r.id: r for r in recognizers}
            lemmas, keywords = nlp_artifacts.lemmas, nlp_artifacts.keywords
            tokens, indices = nlp_artifacts.tokens, nlp_artifacts.tokens_indices
            holds: dict[tuple[str, str], bool] = {}  # (recognizer id, lemma) -> holds a context word
            for result in results:
                meta = result.recognition_metadata
                recognizer = by_id.get(meta[recognizer_key]) if meta and recognizer_key in meta else None
                if not recognizer or not recognizer.context or meta.get(boosted_key):
                    continue
                i = token_at(result.start, tokens, indices)
                words = _keywords_from(i, self.context_prefix_count + 1, lemmas, keywords, -1)
                words += _keywords_from(i, self.context_suffix_count + 1, lemmas, keywords, 1)
                found = False
                for w in words:
                    key = (recognizer.id, w)
                    h = holds.get(key)
                    if h is None:
                        h = holds[key] = self._holds(w, recognizer.context)
                    if h:
                        found = True
                        break
                if not found:
                    continue
                word = self._find_supportive_word_in_context(
                    list(set(words)), recognizer.context, self.context_matching_mode
                )
                if word != "":
                    result.score += self.context_similarity_factor
                    result.score = max(result.score, self.min_score_with_context_similarity)
                    result.score = min(result.score, ContextAwareEnhancer.MAX_SCORE)
                    result.analysis_explanation.set_supportive_context_word(word)
                    result.analysis_explanation.set_improved_score(result.score)
            return results

        def _holds(self, word: str, context: list[str]) -> bool:
            """Whether ``_find_supportive_word_in_context`` would find a context word in ``[word]``
            (its two tests, written out)."""
            w = word.lower()
            if self.context_matching_mode == "whole_word":
                return any(c.lower() == w for c in context)
            return any(c.lower() in w for c in context)

        @staticmethod
        def _find_index_of_match_token(word: str, start: int, tokens, tokens_indices) -> int:
            return token_at(start, tokens, tokens_indices)

    return Enhancer()


def _keywords_from(i: int, n: int, lemmas: list[str], keywords, step: int) -> list[str]:
    """Presidio's ``_add_n_words``: the first ``n`` lemmas (lower-cased) that are keywords,
    from token ``i`` on, backward (``step`` -1) or forward."""
    out: list[str] = []
    while 0 <= i < len(lemmas) and n > 0:
        lemma = lemmas[i].lower()
        if lemma in keywords:
            out.append(lemma)
            n -= 1
        i += step
    return out


def setup() -> None:
    _offline_tldextract()
