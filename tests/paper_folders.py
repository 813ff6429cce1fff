"""Miniature stand-ins for what a user of the paper preset brings: data folders in the hub's
schemas (written by `datasets`, every split) and Hugging Face checkpoint folders of the real
t5-small / gpt-neo-125M / bert-base configurations with random weights (written by
`transformers`). Used by the paper-path and preflight tests."""

import os

import numpy as np


def write_data(root: str, rows: int = 300, rng_seed: int = 0) -> str:
  """DATA/{opus_books,the-stack-smol,imdb,cifar10} as `datasets.save_to_disk` writes them."""
  import datasets
  rng = np.random.default_rng(rng_seed)
  words = ["the", "a", "house", "garden", "book", "river", "small", "red", "walks", "reads"]
  mots = ["la", "une", "maison", "jardin", "livre", "rivière", "petite", "rouge", "marche"]
  sentence = lambda vocabulary: " ".join(rng.choice(vocabulary, int(rng.integers(3, 12))))
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({
      "id": [str(i) for i in range(rows)],
      "translation": [{"en": sentence(words), "fr": sentence(mots)} for _ in range(rows)]})}
  ).save_to_disk(os.path.join(root, "opus_books"))
  code = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * int(rng.integers(2, 6))
          for i in range(rows)]
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({
      "content": code, "lang": ["Python"] * rows, "size": [len(c) for c in code]})}
  ).save_to_disk(os.path.join(root, "the-stack-smol"))
  review = lambda: sentence(words + ["good", "bad", "great", "awful"])
  imdb = {split: datasets.Dataset.from_dict({
      "text": [review() for _ in range(rows // 2)],
      "label": list(rng.integers(0, 2, rows // 2) if split != "unsupervised"
                    else [-1] * (rows // 2))}) for split in ("train", "test", "unsupervised")}
  datasets.DatasetDict(imdb).save_to_disk(os.path.join(root, "imdb"))
  features = datasets.Features({"img": datasets.Image(),
                                "label": datasets.ClassLabel(num_classes=10)})
  images = lambda n: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
  datasets.DatasetDict({split: datasets.Dataset.from_dict(
      {"img": images(rows // 2), "label": list(rng.integers(0, 10, rows // 2))},
      features=features) for split in ("train", "test")}
  ).save_to_disk(os.path.join(root, "cifar10"))
  return root


def write_checkpoints(root: str, corpus) -> dict:
  """{task: folder} of random-weight t5-small, gpt-neo-125M, bert-base (the real
  configurations, with a tokenizer trained on ``corpus``) and ResNet-152 (the paper preset
  asks for a checkpoint of every task it fine-tunes, images included)."""
  import transformers
  from optclip.data import tokenization
  tokenizer = tokenization.train_tokenizer(corpus, 512)
  configs = {
      "translation": (transformers.T5ForConditionalGeneration, transformers.T5Config()),
      "code": (transformers.GPTNeoForCausalLM, transformers.GPTNeoConfig(
          vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
          num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256)),
      "classification": (transformers.BertForSequenceClassification,
                         transformers.BertConfig(num_labels=2)),
      # microsoft/resnet-152's configuration: bottleneck blocks of depths 3, 8, 36, 3.
      "images": (transformers.ResNetForImageClassification,
                 transformers.ResNetConfig(depths=[3, 8, 36, 3])),
  }
  folders = {}
  for task, (cls, config) in configs.items():
    folder = os.path.join(root, task)
    cls(config).save_pretrained(folder)
    if task != "images":
      tokenizer.save(os.path.join(folder, "tokenizer.json"))
    folders[task] = folder
  return folders
