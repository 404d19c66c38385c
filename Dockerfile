# The pab-cluster image: Ray 2.60 + CUDA torch + this project, for every pod of k8s/*.yaml
# (head, GPU workers, autoscaler sidecar and the RayJob submitter).
#
#   docker build -t pab-cluster:0.1.0 .
#   docker tag pab-cluster:0.1.0 <registry>/pab-cluster:0.1.0 && docker push <registry>/pab-cluster:0.1.0
#
# Keep RAY_VERSION equal to the ray pin in pyproject.toml and to `rayVersion` in k8s/*.yaml
# (tests/k8s checks all three). The base image runs as user `ray` (uid 1000, home /home/ray), which is
# what KubeRay expects; its Python is 3.11 for the -py311 tag.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

# torch from PyPI: on Linux x86_64 that wheel is the CUDA build and brings its CUDA runtime as nvidia-*
# wheels, so only the node's driver must be new enough for it (`nvidia-smi`). pyproject pins the same
# torch==2.13.0, so `pip install .` below keeps it.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

# Made by `ray` itself: a WORKDIR that does not exist yet is created root-owned by the classic builder, kaniko and
# buildah (BuildKit alone makes it the user's), and `pip install .` below writes its build files there.
RUN mkdir -p /home/ray/pab-cluster
WORKDIR /home/ray/pab-cluster
# Dependencies first (from pyproject.toml alone), so a code change does not reinstall them.
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --chown=ray:users pab ./pab
COPY --chown=ray:users actors ./actors
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users jobs ./jobs
# A regular (not editable) install: `python -m jobs.render` and `cluster.app:build_app` import from
# site-packages whatever the working directory of the Ray job or Serve replica is.
# The check runs from / so it imports the installed package, not this folder's sources.
RUN pip install --no-cache-dir --no-deps . \
    && cd / && python -c "import torch, ray, av, jobs.render, cluster.app, actors.group"

# Model checkpoints are not baked in: they are downloaded once per pod from S3 into $PAB_CACHE_DIR
# (default ~/.cache/pab; k8s/*.yaml mount an emptyDir there).
ENV RAY_USAGE_STATS_ENABLED=0
