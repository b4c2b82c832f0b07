"""Running the shapes ablation: train_net runs (`runs`) and what the ablation is (`shapes_ablation`)."""
