"""The ShuffleNet v2 paper's experiments, rerun on the deployment hardware through the service's runtime."""
