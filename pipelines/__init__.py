"""diffusers pipelines that load a medaug output folder (installed as `medaug.pipelines`)."""
