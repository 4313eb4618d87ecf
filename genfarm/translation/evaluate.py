"""Translation quality against references: chrF and BLEU computed by sacrebleu, per document and per language.

Translations come from a job's OUTPUT/_documents (document jobs) or its result rows (sentence jobs); references
are JSONL lines {"id", "target_language", "reference"} matched on (id, target language). Corpus scores are per
target language, since one BLEU over several languages means nothing. sacrebleu's metric signatures are reported so
the numbers can be reproduced with sacrebleu itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc

from genfarm.batch.ledger import Ledger
from genfarm.errors import UserError
from genfarm.translation.documents import DOCUMENTS
from genfarm.translation.languages import UnknownLanguage, to_code

REFERENCE_FIELDS = ("id", "target_language", "reference")


@dataclass(frozen=True)
class Translation:
    text: str
    status: str  # complete | partial | failed for documents; complete for sentence rows


@dataclass
class DocumentScore:
    id: str
    target_language: str
    status: str
    chrf: float
    bleu: float


@dataclass
class CorpusScore:
    target_language: str
    documents: int
    chrf: float
    bleu: float
    chrf_signature: str
    bleu_signature: str


def load_translations(output: str) -> dict[tuple[str, str], Translation]:
    """(id, target language code) -> translation, from a job's documents if it has them, else its result rows."""
    store = Ledger(output)
    kind = store.manifest()["spec"]["task"].get("type")  # a folder without a job is the user's mistake, in one line
    if kind != "translate":
        raise UserError("OUTPUT", f"the job in {store.uri} has task.type {kind}, not translate",
                        "give the output.path of a translate job")
    table = store.read(["document_id", "target_language", "text", "status"], folder=DOCUMENTS)
    if table is not None:
        rows = zip(table["document_id"].to_pylist(), table["target_language"].to_pylist(),
                   table["text"].to_pylist(), table["status"].to_pylist())
    else:
        table = store.read(["id", "target_language", "output_text"], where=pc.field("sample_index") == 0)
        if table is None:
            raise UserError("OUTPUT", f"{output} holds no translations yet", "run the translate job to the end first")
        rows = ((i, t, text, "complete") for i, t, text in zip(
            table["id"].to_pylist(), table["target_language"].to_pylist(), table["output_text"].to_pylist()))
    return {(doc_id, _code_or_name(target)): Translation(text or "", status) for doc_id, target, text, status in rows}


def load_references(path: str) -> dict[tuple[str, str], str]:
    """(id, target language code) -> reference, from a JSONL file or a folder of them."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"--references {path}", "not found", "give a JSONL file or a folder of them, e.g. "
                        "examples/references")
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    if not files:
        raise UserError(f"--references {path}", "the folder holds no .jsonl files", "give a JSONL file of references")
    references: dict[tuple[str, str], str] = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(str(file), f"cannot read it as UTF-8 text ({err.__class__.__name__})",
                            "save the references as UTF-8 JSONL") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                key, reference = _reference(line, f"{file}:{number}")
                if key in references:
                    raise UserError(f"{file}:{number}", f"a second reference for {key[0]} -> {key[1]}",
                                    "keep one reference per id and target language")
                references[key] = reference
    if not references:
        raise UserError(f"--references {path}", "holds no references", "write one JSON object per line")
    return references


def _reference(line: str, where: str) -> tuple[tuple[str, str], str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(where, f"not valid JSON ({err.msg})", "write one JSON object per line") from None
    if not isinstance(record, dict):
        raise UserError(where, "expected a JSON object", "write lines like {\"id\": ..., \"target_language\": "
                        "\"de\", \"reference\": ...}")
    missing = [f for f in REFERENCE_FIELDS if not isinstance(record.get(f), str) or not record[f].strip()]
    if missing:
        raise UserError(where, f"missing or empty field(s): {', '.join(missing)}",
                        f"every reference needs the text fields {', '.join(REFERENCE_FIELDS)}")
    try:
        target = to_code(record["target_language"])
    except UnknownLanguage as err:
        raise UserError(where, str(err), "use a BCP 47 code such as de, fr or es") from None
    return (record["id"], target), record["reference"]


def evaluate(translations: dict[tuple[str, str], Translation], references: dict[tuple[str, str], str],
             allow_missing: bool = False) -> tuple[list[CorpusScore], list[DocumentScore]]:
    """Corpus scores per target language and a score per document; every reference needs its translation unless
    `allow_missing`."""
    from sacrebleu.metrics import BLEU, CHRF

    missing = [key for key in references if key not in translations]
    if missing and not allow_missing or len(missing) == len(references):
        raise UserError("--references", f"{len(missing)} of {len(references)} references have no translation in "
                        f"OUTPUT (first: id {missing[0][0]!r} -> {missing[0][1]})",
                        "check that reference ids are the job's input ids and its target languages, or pass "
                        "--allow-missing")
    corpus, documents = [], []
    for target in sorted({key[1] for key in references}):
        keys = [key for key in references if key[1] == target and key in translations]
        if not keys:
            continue
        hypotheses, refs = [translations[k].text for k in keys], [references[k] for k in keys]
        bleu, chrf = BLEU(trg_lang=target.split("-")[0]), CHRF()
        corpus.append(CorpusScore(target, len(keys), chrf.corpus_score(hypotheses, [refs]).score,
                                  bleu.corpus_score(hypotheses, [refs]).score, str(chrf.get_signature()),
                                  str(bleu.get_signature())))
        sentence_bleu = BLEU(trg_lang=target.split("-")[0], effective_order=True)
        for key, hypothesis, reference in zip(keys, hypotheses, refs):
            documents.append(DocumentScore(key[0], target, translations[key].status,
                                           chrf.sentence_score(hypothesis, [reference]).score,
                                           sentence_bleu.sentence_score(hypothesis, [reference]).score))
    return corpus, documents


def as_json(corpus: list[CorpusScore], documents: list[DocumentScore]) -> dict:
    return {"corpus": [asdict(c) for c in corpus], "documents": [asdict(d) for d in documents]}


def _code_or_name(language: str | None) -> str:
    """Sentence jobs may name languages ('French'); compare them as codes where the name is known."""
    try:
        return to_code(language)
    except UnknownLanguage:
        return language or ""

