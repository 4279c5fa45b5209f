"""DistributedDataParallel training: two CPU ranks (gloo) end with identical weights."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import cv2
import numpy as np

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np, torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from gradclip_ros import offline
    from gradclip_ros.model import ModelSpec
    from gradclip_ros.training import Frame, Trainer, TrainerConfig

    out = sys.argv[1]
    device = offline._init_distributed('cpu')
    rank = dist.get_rank()
    data = np.load(sys.argv[2])
    config = TrainerConfig.from_dict({
        'min_buffer_frames': 2, 'holdout_every': 4, 'min_holdout_frames': 1,
        'validate_every': 2, 'hflip_prob': 0.5, 'checkpoint_dir': out + '/checkpoints',
        'device': device})
    trainer = Trainer(config, ModelSpec(class_names=('vehicle',), input_size=128),
                      run_dir=out + '/run')
    for image, boxes in zip(data['images'], data['boxes']):
        trainer.add_prepared(Frame(image, boxes, np.zeros(len(boxes), np.int64), (1920, 1080)))
    records = []
    for _ in range(4):
        records.append(trainer.train_step())
        trainer.maybe_validate()
    trainer.save_checkpoint()
    digest = hashlib.sha256()
    # Parameters only: DDP copies rank 0's batch-norm statistics to the other ranks at the
    # start of each forward, so after the last step those buffers differ until the next one.
    for name, tensor in sorted(trainer.model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    result = {'rank': rank, 'world': dist.get_world_size(), 'hash': digest.hexdigest(),
              'updates': trainer.updates, 'norms': [r['grad_norm_after'] for r in records],
              'losses': [r['loss'] for r in records],
              'local_losses': [r['loss_classification'] for r in records],
              'distributed': trainer.distributed}
    with open(f'{out}/rank{rank}.json', 'w') as handle:
        json.dump(result, handle)
    trainer.close()
    dist.destroy_process_group()
""")


def test_two_ranks_end_with_identical_weights(shared_data, tmp_path):
    root = shared_data / 'driving' / 'apollo'
    coco = json.loads((root / 'labels.json').read_text())
    images, boxes = [], []
    for image in sorted(coco['images'], key=lambda item: item['stamp_ns'])[:8]:
        rgb = cv2.imread(str(root / image['file_name']))[:, :, ::-1]
        images.append(cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA))
        scale = np.array([128 / 1920, 128 / 1080] * 2, np.float32)
        annotations = [a['bbox'] for a in coco['annotations'] if a['image_id'] == image['id']]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in annotations]
        boxes.append(np.asarray(xyxy, np.float32) * scale)
    data = tmp_path / 'frames.npz'
    np.savez(data, images=np.stack(images), boxes=np.stack(boxes))
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)

    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
         '--master-port', str(29500 + os.getpid() % 1000), str(script), str(tmp_path),
         str(data)],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in (0, 1)]
    assert all(rank['distributed'] and rank['world'] == 2 for rank in ranks)
    assert ranks[0]['updates'] == ranks[1]['updates'] == 4
    # Both ranks clip the same all-reduced gradients...
    assert ranks[0]['norms'] == ranks[1]['norms']
    # ...see different batches, so their local losses differ, and agree on the mean loss.
    assert ranks[0]['local_losses'] != ranks[1]['local_losses']
    assert ranks[0]['losses'] == ranks[1]['losses']
    assert ranks[0]['hash'] == ranks[1]['hash']

    # Only rank 0 writes logs and checkpoints.
    log = pathlib.Path(tmp_path / 'run' / 'train_log.jsonl').read_text().splitlines()
    assert len(log) == 4
    checkpoint = tmp_path / 'checkpoints' / 'step-000004.safetensors'
    assert checkpoint.is_file()
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest()
