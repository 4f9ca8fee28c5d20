"""Export the study config schema (`deconver.config.Study`) as JSON Schema.

    python workflow/scripts/make_schema.py        # rewrites workflow/schemas/study.schema.json

The pydantic model is the source of truth (the workflow validates with `load_study`, strict types);
the JSON Schema is for editors and readers (e.g. `# yaml-language-server: $schema=...`). A test
fails when the file and the model drift apart.
"""
import json
import sys
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "study.schema.json"


def schema_text() -> str:
    from deconver.config import Study

    schema = Study.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = "Generated from deconver.config.Study by workflow/scripts/make_schema.py; do not edit."
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    from deconver.io import write_text_atomic

    write_text_atomic(SCHEMA, schema_text())
    print(f"wrote {SCHEMA}", file=sys.stderr)
