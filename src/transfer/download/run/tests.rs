use super::Tasks;

#[tokio::test]
async fn finished_tasks_are_not_kept() {
    let mut tasks = Tasks::default();
    for _ in 0..1000 {
        tasks.spawn(async {});
        tokio::task::yield_now().await;
    }
    // Let the last ones end, then start one more: only what runs is held.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tasks.spawn(std::future::pending());
    assert!(tasks.len() < 10, "{} tasks held", tasks.len());
}
