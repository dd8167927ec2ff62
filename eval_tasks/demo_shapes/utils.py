"""The demo_shapes task's functions: one document per question, its picture, its text and exact-match scoring."""


def one_question_per_doc(dataset):
    """Rows of the image folder (an image and its list of questions) -> one row per question, in file order."""

    def explode(batch):
        out = {"image": [], "file_name": [], "question": [], "answer": []}
        for image, name, questions in zip(batch["image"], batch["file_name"], batch["questions"]):
            for qa in questions:
                out["image"].append(image)
                out["file_name"].append(name)
                out["question"].append(qa["question"])
                out["answer"].append(qa["answer"])
        return out

    if "file_name" not in dataset.column_names:  # the image folder loader keeps it only as the image's path
        dataset = dataset.map(lambda row: {"file_name": ""})
    return dataset.map(explode, batched=True, remove_columns=dataset.column_names)


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].strip().lower())}
