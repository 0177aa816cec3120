"""doc_to_* functions of the generated tiny task (copied next to its YAML by conftest.py)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip()
    return {"accuracy": float(answer == doc["answer"]), "nonempty": float(bool(answer))}
