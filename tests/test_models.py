"""Our Flax models against the PyTorch `transformers` classes on the same random weights.

Each test builds a tiny random model with transformers, saves it with HF's own
`save_pretrained`, loads it with `optclip.models.load_pretrained` and compares logits and loss
on the same inputs (float32, 1e-4). The reverse direction (our save → HF load) is checked too.
"""

import json
import os

import chex
import jax
import numpy as np
import pytest

import optclip.models as models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.manual_seed(0)

ATOL = 1e-4


def _hf_t5():
  config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_decoder_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, dropout_rate=0.0,
                                 decoder_start_token_id=0)
  return transformers.T5ForConditionalGeneration(config)


def _hf_t5_gated_untied():
  config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                 num_decoder_layers=2, num_heads=2, dropout_rate=0.0,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 decoder_start_token_id=0)
  return transformers.T5ForConditionalGeneration(config)


def _hf_gpt_neo():
  config = transformers.GPTNeoConfig(vocab_size=96, max_position_embeddings=32, hidden_size=32,
                                     num_layers=2, num_heads=4, window_size=4,
                                     attention_types=[[["global", "local"], 1]],
                                     embed_dropout=0.0, attention_dropout=0.0,
                                     resid_dropout=0.0)
  return transformers.GPTNeoForCausalLM(config)


def _hf_bert():
  config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=40,
                                   max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, num_labels=2)
  return transformers.BertForSequenceClassification(config)


def _hf_resnet(layer_type):
  config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                     depths=[1, 2], layer_type=layer_type, num_labels=5)
  return transformers.ResNetForImageClassification(config)


def _text_batch(rng, vocab, batch=3, length=11):
  ids = rng.integers(2, vocab, size=(batch, length))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # one padded row
  labels = rng.integers(2, vocab, size=(batch, length - 3))
  labels[2, 5:] = -100
  return ids, mask, labels


def _save(hf_model, folder):
  # Perturb the weights HF initialises to constants (norm scales, zero biases) so the test
  # also sees whether they are mapped to the right place.
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf_model.eval()
  hf_model.save_pretrained(folder, safe_serialization=True)
  return hf_model


@pytest.mark.parametrize("builder", [_hf_t5, _hf_t5_gated_untied])
def test_t5_matches_transformers(tmp_path, builder):
  hf = _save(builder(), tmp_path)
  model, params = models.load_pretrained(str(tmp_path))
  ids, mask, labels = _text_batch(np.random.default_rng(0), 96)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels))
  batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
  logits = models.make_logits_fn(model)(params, batch)
  np.testing.assert_allclose(logits, out.logits.numpy(), atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(models.make_loss_fn(model)(params, batch), out.loss.item(),
                             atol=ATOL, rtol=ATOL)


def test_gpt_neo_matches_transformers(tmp_path):
  hf = _save(_hf_gpt_neo(), tmp_path)
  model, params = models.load_pretrained(str(tmp_path))
  ids, mask, _ = _text_batch(np.random.default_rng(1), 96, length=13)
  labels = np.where(mask == 1, ids, -100)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels))
  batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
  logits = models.make_logits_fn(model)(params, batch)
  keep = mask.astype(bool)  # HF leaves padded query rows at arbitrary values
  np.testing.assert_allclose(np.asarray(logits)[keep], out.logits.numpy()[keep],
                             atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(models.make_loss_fn(model)(params, batch), out.loss.item(),
                             atol=ATOL, rtol=ATOL)


def test_bert_matches_transformers(tmp_path):
  hf = _save(_hf_bert(), tmp_path)
  model, params = models.load_pretrained(str(tmp_path))
  ids, mask, _ = _text_batch(np.random.default_rng(2), 96)
  label = np.array([0, 1, 1])
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(label))
  batch = {"input_ids": ids, "attention_mask": mask, "label": label}
  np.testing.assert_allclose(models.make_logits_fn(model)(params, batch), out.logits.numpy(),
                             atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(models.make_loss_fn(model)(params, batch), out.loss.item(),
                             atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_resnet_matches_transformers(tmp_path, layer_type):
  hf = _save(_hf_resnet(layer_type), tmp_path)
  with torch.no_grad():  # non-trivial running statistics
    for module in hf.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  model, params, state = models.load_pretrained(str(tmp_path), with_state=True)
  pixels = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    eval_logits = hf(pixel_values=torch.tensor(pixels)).logits.numpy()
    hf.train()
    train_logits = hf(pixel_values=torch.tensor(pixels)).logits.numpy()
  batch = {"pixels": np.transpose(pixels, (0, 2, 3, 1)), "label": np.array([1, 3])}
  family = models.family(model)
  np.testing.assert_allclose(family.logits_fn(model, params, batch, state["batch_stats"]),
                             eval_logits, atol=ATOL, rtol=ATOL)
  ours_train, _ = model.apply({"params": params, **state}, batch["pixels"], train=True,
                              mutable=["batch_stats"])
  np.testing.assert_allclose(ours_train, train_logits, atol=ATOL, rtol=ATOL)


def test_a_config_saved_with_transformers_default_labels_loads_with_two(tmp_path):
  """save_pretrained omits id2label at transformers' default of 2 labels; the folder then
  holds a 2-class head, which the loader must expect (not the ResNet family's 10)."""
  config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                     depths=[1, 1])
  hf = transformers.ResNetForImageClassification(config).eval()
  hf.save_pretrained(tmp_path, safe_serialization=True)
  assert "id2label" not in json.load(open(tmp_path / "config.json"))
  model, params, state = models.load_pretrained(str(tmp_path), with_state=True)
  assert model.config.num_labels == 2
  pixels = np.random.default_rng(4).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    expected = hf(pixel_values=torch.tensor(pixels)).logits.numpy()
  batch = {"pixels": np.transpose(pixels, (0, 2, 3, 1)), "label": np.array([0, 1])}
  np.testing.assert_allclose(
      models.family(model).logits_fn(model, params, batch, state["batch_stats"]), expected,
      atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", ["t5-micro", "gpt-neo-micro", "bert-micro", "resnet-tiny"])
def test_save_pretrained_round_trips_through_transformers(tmp_path, name):
  model = models.create(name)
  params, state = models.init_params(model, jax.random.PRNGKey(0), with_state=True)
  models.save_pretrained(str(tmp_path), model, params, state)
  hf_class = getattr(transformers, json.load(open(tmp_path / "config.json"))["architectures"][0])
  hf = hf_class.from_pretrained(str(tmp_path)).eval()
  batch = models.family(model).dummy_batch(model.config)
  batch = jax.tree.map(lambda x: np.asarray(x) + (np.arange(x.shape[-1]) % 5 if x.dtype == np.int32 and x.ndim == 2 else 0), batch)
  with torch.no_grad():
    if name.startswith("resnet"):
      batch["pixels"] = np.random.default_rng(0).normal(size=batch["pixels"].shape).astype(np.float32)
      theirs = hf(pixel_values=torch.tensor(np.transpose(batch["pixels"], (0, 3, 1, 2)))).logits
      ours = models.family(model).logits_fn(model, params, batch, state["batch_stats"])
    elif name.startswith("t5"):
      theirs = hf(input_ids=torch.tensor(batch["input_ids"]),
                  labels=torch.tensor(batch["labels"])).logits
      ours = models.make_logits_fn(model)(params, batch)
    else:
      theirs = hf(input_ids=torch.tensor(batch["input_ids"])).logits
      ours = models.make_logits_fn(model)(params, batch)
  np.testing.assert_allclose(ours, theirs.numpy(), atol=ATOL, rtol=ATOL)
  # and back: our loader reads what we wrote, bit for bit
  _, reloaded = models.load_pretrained(str(tmp_path))
  chex.assert_trees_all_equal(reloaded, params)


def test_missing_and_mismatched_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  model = models.create("gpt-neo-micro")
  models.save_pretrained(str(tmp_path), model, models.init_params(model, jax.random.PRNGKey(0)))
  with pytest.raises(models.CheckpointError, match="exists"):
    models.save_pretrained(str(tmp_path), model, models.init_params(model, jax.random.PRNGKey(0)))
  tensors = load_file(tmp_path / "model.safetensors")
  tensors.pop("transformer.h.1.mlp.c_fc.weight")
  save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(models.CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
    models.load_pretrained(str(tmp_path))
  tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((3, 3), np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  with pytest.raises(models.CheckpointError, match=r"model\.safetensors.*c_fc.*shape \(3, 3\)"):
    models.load_pretrained(str(tmp_path))
  with pytest.raises(models.CheckpointError, match="does not exist"):
    models.load_pretrained(str(tmp_path / "nowhere"))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(models.CheckpointError, match="no weights"):
    models.load_pretrained(str(tmp_path))
