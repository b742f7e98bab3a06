"""Helpers the hf-compress lm-eval task configs call (`!function hf_compress.evaluation.tasks.utils.<name>`).

The stock `wikitext` task reads `EleutherAI/wikitext_document_level` from the Hub. `wikitext2_documents` rebuilds
the same documents offline from the line-level WikiText-2 raw test file: an article starts at a top-level heading
line (` = Title = `), and its page is the concatenation of its lines. Prompting and scoring are the stock task's
(`wikitext_detokenizer`, `process_results`), so word perplexity is computed exactly as lm-eval does it.
"""

from __future__ import annotations

import re
from pathlib import Path

from lm_eval.tasks.wikitext.preprocess_wikitext import (
    process_results,
    wikitext_detokenizer,
)

# Absolute: lm-eval may load this file by its path, outside the package.
from hf_compress.evaluation.tasks.catalog import WIKITEXT2_TEST, data_dir

__all__ = ["WIKITEXT2_TEST", "data_dir", "process_results", "wikitext2_documents", "wikitext_detokenizer"]

# A top-level heading has exactly one "=" on each side; sections (" = = Career = = ") do not start articles.
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = \n?$")


def split_articles(lines: list[str]) -> list[str]:
    """Groups WikiText lines (blank lines are "") into one page per article."""
    pages: list[list[str]] = []
    for line in lines:
        if _ARTICLE_HEADING.match(line) or not pages:
            pages.append([])
        # The raw file's blank lines are a lone newline; the line-level dataset stores them as "".
        pages[-1].append(line if line else "\n")
    return ["".join(page).strip("\n") + "\n" for page in pages if "".join(page).strip()]


def wikitext2_documents(data_file: str | None = None, **_metadata):
    """`custom_dataset` of `hfc_wikitext2`: the WikiText-2 raw test articles as a `DatasetDict` with a `page` column."""
    import datasets

    path = Path(data_file) if data_file else data_dir() / WIKITEXT2_TEST
    if not path.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test file not found at {path}; set HF_COMPRESS_DATA to the folder holding {WIKITEXT2_TEST}"
        )
    lines = datasets.load_dataset("parquet", data_files={"test": str(path)}, split="test")["text"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": split_articles(lines)})})
