from gpuboss_client import Boss


def test_grant_and_release(boss: Boss) -> None:
    boss.add_device("gpu0", "24GiB", cuda_index=0)
    lease = boss.acquire("8GiB")
    assert lease.device == "gpu0"
    assert boss.devices()[0].used_mib == 8192
    boss.release(lease)
    assert boss.devices()[0].used_mib == 0
