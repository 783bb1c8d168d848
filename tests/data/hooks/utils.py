"""`!function` hooks of the hook test tasks (hooks_tiny, hooks_text, hooks_raise), written in the
style of lm-evaluation-harness task utilities. `process_docs` gets a `datasets.Dataset`."""

def process_docs(dataset):
    # Rows marked `skip` are dropped; the rest gain the fields the prompt uses.
    def _process(doc):
        return {
            "query": doc["question"].strip().capitalize(),
            "choices": doc["options"].split("|"),
            "gold": int(doc["answer"]),
        }

    return dataset.filter(lambda d: not d["skip"]).map(_process)


def doc_to_text(doc):
    return f"Question: {doc['query']}\nAnswer:"


def doc_to_target(doc):
    return doc["gold"]


def doc_to_choice(doc):
    return doc["choices"]


def plain_text(doc):
    print("hooks may print to stdout")
    return "Q: " + doc["question"].strip()


def split_options(doc):
    return tuple(doc["options"].split("|"))


def raises(doc):
    if doc["question"].startswith("Water"):
        raise ValueError("no text for water questions")
    return doc["question"]
