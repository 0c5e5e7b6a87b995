"""The one training loop and the registries of policy losses and advantage estimators."""
