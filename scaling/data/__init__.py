"""Data pipelines (grain): the synthetic world (default) and real data set loaders."""
