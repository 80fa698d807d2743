"""What `config.model.pretrained` names, and where its file comes from (no flax here: config_validation reads it).

  ''              not given: training refuses it (config_validation), eval/predict/export do not read it
  'none'          train from a random backbone, on purpose
  hf://OWNER/REPO[/FILE]   a file of a Hugging Face Hub repository (FILE defaults to model.safetensors), fetched
                  once into huggingface_hub's cache; e.g. hf://timm/resnet50.tv_in1k, torchvision's ImageNet
                  ResNet-50 (what mmdet's `torchvision://resnet50` loads) under timm's names, which are torchvision's
  PATH            a .safetensors / .npz state dict (mrqm_jax/weights.py imports it)
"""

from mrqm_jax import errors

# `config.model.pretrained` values that are not a file: train from a random backbone on purpose, or a file of a
# Hugging Face Hub repository, hf://OWNER/REPO[/PATH] (PATH defaults to HF_DEFAULT_FILE).
NO_PRETRAINED = 'none'
HF_SCHEME = 'hf://'
HF_DEFAULT_FILE = 'model.safetensors'
TORCHVISION_RESNET50 = 'hf://timm/resnet50.tv_in1k'   # torchvision's IMAGENET1K_V1 weights under timm's names


def parse_hf_spec(spec: str) -> tuple[str, str] | None:
  """'hf://OWNER/REPO[/PATH]' -> (repo id 'OWNER/REPO', file PATH or HF_DEFAULT_FILE); None if it is not one."""
  if not spec.startswith(HF_SCHEME):
    return None
  parts = spec[len(HF_SCHEME):].split('/')
  if len(parts) < 2 or not all(parts):
    return None
  path = '/'.join(parts[2:]) or HF_DEFAULT_FILE
  if not path.endswith(('.safetensors', '.npz')):
    return None
  return f'{parts[0]}/{parts[1]}', path


def resolve(spec: str) -> str | None:
  """The local file `config.model.pretrained` names, or None for '' / 'none' (no pretrained backbone).

  hf://OWNER/REPO[/PATH] goes through huggingface_hub's cache (`hf_hub_download`: downloads once, later runs
  read the cache; HF_HUB_OFFLINE=1 reads only the cache, HF_HUB_CACHE / HF_HOME move it). A file that cannot be
  had is an errors.ConfigError, one line saying how to get it.
  """
  if not spec or spec == NO_PRETRAINED:
    return None
  parsed = parse_hf_spec(spec)
  if parsed is None:
    return spec
  repo_id, filename = parsed
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.hf_hub_download(repo_id, filename)
  except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
    why = 'HF_HUB_OFFLINE is set and it is not in the cache' if huggingface_hub.constants.is_offline_mode() else (
        f'not in the cache and the Hub cannot be reached ({errors.one_line(e, 120)})')
    raise errors.ConfigError(
        f'config.model.pretrained={spec!r}: {why}; fetch it once where the Hub is reachable '
        f'(`hf download {repo_id} {filename}`, then copy the cache, ~/.cache/huggingface/hub, or set '
        f'HF_HUB_CACHE), or pass a .safetensors/.npz file (mrqm_jax/weights.py says how to make one)') from None
  except (hf_errors.RepositoryNotFoundError, hf_errors.EntryNotFoundError, hf_errors.RevisionNotFoundError) as e:
    raise errors.ConfigError(f'config.model.pretrained={spec!r}: no such file on the Hugging Face Hub '
                             f'({errors.one_line(e, 160)})') from None
