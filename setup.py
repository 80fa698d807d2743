"""mrqm_jax: MRQM small-object DETR (BiFPN + Scale-Aware Encoder + IoU-Aware Head) in JAX/Flax."""

from setuptools import find_packages, setup

# Versions resolved together on Python 3.11 (pip, 2026-11-25). Move them together and re-run the suite and
# benchmarks/: XLA:CPU performance (see mrqm_jax/models/layers.py) depends on the jax pin.
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    'pycocotools==2.0.11',
    'ml-collections==1.1.0',
    'clu==0.0.12',
    'numpy==2.4.6',
    'scipy==1.17.1',
    'tqdm==4.70.1',
    'absl-py==2.5.1',
    'pillow==13.0.0',
    'safetensors==0.8.0',
    'matplotlib==3.11.2',
    'tensorboard==2.21.0',   # clu's metric writers need it; tensorflow-cpu does not pull it in
    'huggingface_hub==2.4.0',   # model.pretrained='hf://timm/resnet50.tv_in1k' through its cache (mrqm_jax/weights.py)
]

EXTRAS = {
    'dev': [
        'pytest==9.2.0',
        'pytest-xdist==3.8.0',
        'hypothesis==6.170.17',
        'nbclient==0.11.0',
        'nbformat==5.11.1',
        'ipykernel==7.4.0',
    ],
    # Accelerator jaxlib: same jax version, the plugin wheels that match it.
    'cuda': ['jax[cuda12]==0.10.2'],
    'tpu': ['jax[tpu]==0.10.2'],
}

setup(
    name='mrqm_jax',
    version='0.1.0',
    description=__doc__,
    python_requires='>=3.11',
    packages=find_packages(include=['mrqm_jax', 'mrqm_jax.*', 'input_pipeline', 'input_pipeline.*',
                                    'configs', 'configs.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
