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

# torch wheels carry their own CUDA runtime; only the node's driver must be new enough.
# pyproject pins torch==2.13.0, which the +cu128 build satisfies, so `pip install .` keeps it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/ray/pab-cluster
# Dependencies first so code edits do not re-download them. README.m[d]: the glob lets the build go on
# in a checkout without a README (pyproject names it, setuptools only warns when it is missing).
COPY --chown=ray:users pyproject.toml README.m[d] ./
COPY --chown=ray:users pab ./pab
COPY --chown=ray:users actors ./actors
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users jobs ./jobs
# A regular (not editable) install: `python -m jobs.render` and `cluster.app:build_app` import from
# site-packages whatever the working directory of the Ray job or Serve replica is.
RUN pip install --no-cache-dir . && python -c "import torch, ray, av, jobs.render, cluster.app, actors.group"

# Model checkpoints are not baked in: they are downloaded once per pod from S3 into $PAB_CACHE_DIR
# (default ~/.cache/pab; k8s/*.yaml mount an emptyDir there).
ENV RAY_USAGE_STATS_ENABLED=0
